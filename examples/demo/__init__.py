"""The demo: the paper's comparison at toy scale on the embedded data (recipe.yaml, report.py; README "The demo")."""
