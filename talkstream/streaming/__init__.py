"""talkstream.streaming"""
