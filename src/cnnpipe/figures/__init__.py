"""The plots stage: every report figure (drawn from the reports, or copied back from the figure store) and reports/README.md."""
