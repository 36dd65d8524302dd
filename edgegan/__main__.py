from edgegan.cli import app

app()
