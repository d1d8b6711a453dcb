"""Searching the five-aspect CSL design space: space files (``search.space``) and the search runners."""
