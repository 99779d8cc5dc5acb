"""kiln.triton"""
