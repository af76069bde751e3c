"""What the stages write for people: the train stage's tables, the figures, reports/README.md."""
