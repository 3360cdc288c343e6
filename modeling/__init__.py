"""MHA -> MLA conversion and the remote-code model files shipped in every checkpoint."""
