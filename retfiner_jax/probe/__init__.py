"""Linear probing of frozen vision encoders with the paper's protocol.

folders.py reads ImageFolder datasets; features.py extracts (and caches) features once; heads.py trains every
seed's linear head at once on device; metrics.py scores them; run.py ties it together (CLI: __main__.py).
"""
