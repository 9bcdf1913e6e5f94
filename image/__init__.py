"""polydiff image domain package (see ../shared/DESIGN.md)."""
