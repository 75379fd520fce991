"""On-disk contracts: radio-map, dataset and run stores, workspace layout, atomic writes."""
