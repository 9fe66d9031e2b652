"""HTTP API and web page for clip4str (`pip install clip4str[serve]`)."""
