"""`make faults`: fault injection under a live writer; see docs/faults.md and faults/__main__.py."""
