"""The 2D toy suite: exact Gaussian-mixture teacher, DMD vs DFD arms, theory checks (see toy/mixture.py)."""
