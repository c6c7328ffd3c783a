"""The synthetic phantom archive: written in the exact layout of a real archive (MIMIC-CXR-JPG,
NIH ChestX-ray14, CheXpert) with findings drawn inside the anatomy. Kept apart from the library:
no stage depends on it except through ``truth`` (where the generator drew each finding)."""
