"""Launching: from the merged config to the command that starts every rank (launcher), launches across
hosts (multihost) and deepy's supervision of one node's ranks (supervisor).
`python -m neox_fork.launch rank|watch|finished ...` runs __main__.py.
"""
