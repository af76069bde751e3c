from cnnpipe.cli.main import main

main()
