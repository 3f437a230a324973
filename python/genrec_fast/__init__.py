"""genrec_fast"""
