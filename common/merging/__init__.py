"""Merge rules that the server computes from sums over the sites alone (`rules`), and the site-side statistics
they need (`statistics`)."""
