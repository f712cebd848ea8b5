"""talkstream.training"""
