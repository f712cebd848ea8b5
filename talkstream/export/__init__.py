"""talkstream.export"""
