"""LVPNet Archive service: DICOM and DICOMweb ingest, catalog, object storage.  Never imports torch."""
