from edgegan.cli import entry

entry()
