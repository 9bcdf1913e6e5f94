"""polydiff tabular domain package (see ../shared/DESIGN.md)."""
