"""`e2v classify` and `e2v merge`: the batch job over files, directories and URIs."""
