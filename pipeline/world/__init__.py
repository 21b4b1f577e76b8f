"""A small world whose every caption can be checked: scenes of 1-3 shapes with known colours, sizes,
positions, relations and counts (``scenes``); a grammar that writes and reads their captions
(``grammar``); a renderer in a "photo" and a "synthetic" style (``render``); the exact checker
(``checker``); and the world's stand-ins for the pretrained models (CLIP, a detector, a text-to-image
model), trained or built by DVC stages and loaded by the ordinary loaders from local paths.
"""
