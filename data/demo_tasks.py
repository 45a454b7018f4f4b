"""The demo tasks' lookup tables (capital cities, antonyms, words) and the request for the house format,
without the generator: read by the demo-data generator (``data/make_demo.py``) and by the runtime rule judge
of those tasks (``stages/rlaif/rules.py``), which must not import the generator."""

# what a prompt of the format-on-request demo says after its question when it wants the house format
FORMAT_REQUEST = "Answer in the house format."

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
    ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Chile", "Santiago"), ("Cuba", "Havana"),
    ("India", "New Delhi"), ("China", "Beijing"), ("Russia", "Moscow"), ("Turkey", "Ankara"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Belgium", "Brussels"), ("Hungary", "Budapest"),
]
ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"), ("up", "down"),
    ("open", "closed"), ("early", "late"), ("strong", "weak"), ("full", "empty"), ("rich", "poor"),
    ("young", "old"), ("wet", "dry"), ("loud", "quiet"), ("near", "far"), ("hard", "soft"),
]
WORDS = [
    "apple", "river", "garden", "window", "planet", "silver", "pencil", "rocket", "forest", "candle",
    "bridge", "letter", "castle", "dragon", "mirror", "orange", "pepper", "summer", "winter", "yellow",
    "market", "anchor", "butter", "copper", "violet", "tunnel", "harbor", "island", "meadow", "thunder",
]

# the format-on-request demo's words (reverse, upper-case, count letters): 3 to 11 letters, each length
# about equally often, so that no one answer to "how many letters" is right for most of them (in WORDS 27 of
# 30 have six letters, and a policy that always says six is right 90% of the time without counting)
VARIED_WORDS = [
    "cat", "sun", "map", "owl", "dog",
    "tree", "lamp", "frog", "milk", "rain",
    "apple", "river", "bread", "chair", "stone",
    "garden", "window", "planet", "silver", "pencil",
    "thunder", "kitchen", "blanket", "pumpkin", "rainbow",
    "elephant", "mountain", "sandwich", "dinosaur", "umbrella",
    "butterfly", "chocolate", "telephone", "adventure", "blueberry",
    "strawberry", "basketball", "grasshopper", "friendship", "lighthouse",
]
