"""One module per component kind; each registers itself by name in mossvl_lab.registry."""
