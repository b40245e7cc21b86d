"""FastEWQ: block features from metadata alone (features), the dataset and the
classifiers that predict EWQ's choice from them (dataset, classify), Algorithm 2."""
