"""What every stage shares, importing nothing of KneeReconLib: the error type (exit 2), the label
table, DESIGN.md's views and reconstruction grid, and the n-d image filters (numpy, SimpleITK) used
from io up."""
