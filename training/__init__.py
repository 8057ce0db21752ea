"""SimpleSliceNet training tools: synthetic data, dataset loaders."""
