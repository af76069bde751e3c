from cnnpipe.cli import main

main()
