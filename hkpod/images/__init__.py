"""Ubuntu cloud images: the release catalog, mirrors, verified downloads and the local cache."""
