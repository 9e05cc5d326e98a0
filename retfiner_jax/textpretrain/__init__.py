"""Sentence-level pretraining of a BERT text tower on reports alone, so that its [CLS] tells reports apart before
RetFiner's contrastive objective needs it to (issue 34: a random BERT gives every report the same [CLS])."""
