"""What every stage shares, importing nothing of KneeReconLib: the error type (exit 2), the label table
and DESIGN.md's views and reconstruction grid."""
