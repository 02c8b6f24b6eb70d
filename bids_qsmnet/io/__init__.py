"""Reading and writing volumes and files (NIfTI via nibabel, atomic writes)."""
