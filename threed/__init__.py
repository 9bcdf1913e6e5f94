"""polydiff threed domain package (see ../shared/DESIGN.md)."""
