"""Datasets: file loaders (IDX, scikit-learn's digits, XOR) and their protocol sections."""
