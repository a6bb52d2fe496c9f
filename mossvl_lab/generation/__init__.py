"""Token selection and generation loops (offline queue APIs arrive with the media issue)."""
