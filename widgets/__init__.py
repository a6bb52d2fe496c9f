"""Notebook widgets for mossvl-lab, imported as `mossvl_lab.widgets`.

Placeholder: the widgets come later. Each will be one `<name>.py` (an anywidget class with
synced traits) plus `<name>.js` (+ `.css`), no build step, no CDN imports. This package never
imports torch; adapters in `mossvl_lab.viz` hand it numpy arrays, bytes and dicts.
"""
