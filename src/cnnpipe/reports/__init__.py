"""What the train stage writes for people: grid.csv, history.csv, curves.csv, train.json, layer histograms."""
