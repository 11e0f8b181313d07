"""The DICOM SCP: C-ECHO and C-STORE (every storage SOP class, private ones included)."""
