"""Merge rules that the server computes from sums over the sites alone (`rules`), and the site-side statistics
they need (`statistics`)."""

# the rules' names, without importing torch (the CLI and the run config check `--merge` before torch loads);
# `rules.RULES` has exactly these
RULE_NAMES = ("weighted-sum", "fisher", "regmean")
