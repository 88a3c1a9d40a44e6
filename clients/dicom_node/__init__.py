"""``sat-dicom-node``: a DICOM node between a hospital's PACS and the SAT Triton server.

Series come in over DIMSE (a storage SCP) or DICOMweb, are grouped and routed to a task, segmented through
:class:`satseg_clients.sat_client.SATClient` and sent back as DICOM SEG. Every job is a row of a SQLite database,
so the node resumes after any crash without losing or duplicating a result.
"""
