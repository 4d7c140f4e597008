"""Model sub-modules with one job each (SAP, fusion, expert mixtures)."""
