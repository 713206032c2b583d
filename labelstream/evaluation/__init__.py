"""Evaluating taxonomies on labelled data (`labelstream eval`) and auditing the live stream (`labelstream gallery`)."""
