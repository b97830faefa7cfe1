"""Stories to tokenize: an embedded TinyStories-like grammar (so the pipeline runs offline) and the real loaders.

Both give an iterator of story strings; nothing here holds a whole corpus in memory.
"""

from __future__ import annotations

import functools
import itertools
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from labpipe.errors import InputError

# ----------------------------------------------------------------------------- embedded corpus
# Word pools and each step's templates are ordered most common first and drawn with Zipf weights: the head
# recurs in every story while the tail shows up rarely, so a top-K vocabulary keeps some sentences, drops others.

ZIPF_EXPONENT = 1.3
GIRLS = (
    "Lily Sue Mia Anna Lucy Amy Emma Sara Kate Zoe Ella Ruby Daisy Rose Molly Jane Ivy Nora Grace Chloe Sophie "
    "Bella Poppy Jenny Tina Wendy Hannah Olivia Millie Kim"
)
BOYS = (
    "Tom Ben Tim Max Sam Jack Timmy Leo Bob Joe Jake Billy Lucas Finn Oscar Henry Adam Noah Ryan Eli Theo Jimmy "
    "Danny Peter Owen Luke Milo Ned Rex Zack"
)
ANIMALS = (
    "dog cat bird bunny bear puppy fox frog duck mouse kitten fish owl squirrel lion rabbit horse cow pig turtle "
    "monkey elephant butterfly bee sheep deer snail wolf tiger giraffe penguin dolphin hen goat ladybug raccoon "
    "hedgehog ant whale zebra kangaroo parrot lamb pony goose crab bat beaver donkey swan"
)
TOYS = (
    "ball toy kite book doll car box hat balloon truck teddy train boat blanket drum robot bike cup crayon puzzle "
    "shell stick rock key ring necklace bucket shovel spoon sock scarf feather whistle wagon umbrella bell coin "
    "button sled jar map kettle flute marble puppet lantern compass pillow basket mitten"
)
FOODS = (
    "cake apple cookie candy sandwich banana pie soup bread carrot cheese muffin pear lemon cupcake peach pancake "
    "plum cherry pretzel"
)
PLACES = (
    "park garden forest house beach school river pond farm yard lake playground woods zoo hill kitchen field store "
    "library meadow castle cave jungle mountain village town barn bakery sea island desert valley swamp museum orchard"
)
ADJECTIVES = (
    "big little small happy pretty new old shiny funny kind soft tiny fluffy nice brave tall fast huge silly gentle "
    "sparkly colorful curious smart strong friendly beautiful special magic bright warm cold quiet loud sleepy shy "
    "lonely grumpy clever fancy dusty round smooth bumpy sticky fuzzy giant lucky proud wise"
)
COLORS = "red blue green yellow pink purple orange white black brown gold silver"
FEELINGS = (
    "happy sad scared excited surprised angry tired worried proud curious sorry glad upset calm nervous grateful "
    "lonely jealous thankful confused"
)
RELATIVES = "mom dad friend sister brother grandma grandpa teacher aunt uncle cousin neighbor"
VERBS = (  # base:past
    "play:played run:ran jump:jumped swim:swam dance:danced sing:sang read:read draw:drew climb:climbed "
    "paint:painted hop:hopped explore:explored build:built bake:baked hide:hid skip:skipped ride:rode dig:dug "
    "laugh:laughed fly:flew splash:splashed swing:swung race:raced color:colored write:wrote slide:slid roll:rolled "
    "march:marched whistle:whistled giggle:giggled twirl:twirled sail:sailed skate:skated"
)
IRREGULAR_PLURALS = dict(mouse="mice", sheep="sheep", fish="fish", deer="deer", wolf="wolves", goose="geese")


def plural(noun: str) -> str:
    """dog -> dogs, bunny -> bunnies, fox -> foxes; a verb agreeing with he/she takes the same ending (flies)."""
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    if re.search(r"[^aeiou]y$", noun):
        return noun[:-1] + "ies"
    return noun + ("es" if re.search(r"(s|sh|ch|x|z)$", noun) else "s")


@functools.cache
def _zipf_cumulative_weights(n: int) -> list[float]:
    return list(itertools.accumulate(1 / rank**ZIPF_EXPONENT for rank in range(1, n + 1)))


def zipf_choice(rng: random.Random, items: list[str]) -> str:
    return rng.choices(items, cum_weights=_zipf_cumulative_weights(len(items)))[0]


_verb_pairs = [pair.split(":") for pair in VERBS.split()]
POOLS = {  # template slot -> words
    "girl": GIRLS.split(),
    "boy": BOYS.split(),
    "animal": ANIMALS.split(),
    "animals": [plural(animal) for animal in ANIMALS.split()],
    "toy": TOYS.split(),
    "food": FOODS.split(),
    "place": PLACES.split(),
    "adj": ADJECTIVES.split(),
    "color": COLORS.split(),
    "feeling": FEELINGS.split(),
    "relative": RELATIVES.split(),
    "verb": [base for base, _ in _verb_pairs],
    "verbs": [plural(base) for base, _ in _verb_pairs],
    "verbed": [past for _, past in _verb_pairs],
}

# A story is a sequence of steps; each step picks one of its templates ("" = skip the step). Slots in braces
# are the story's cast ({name}, {he}, {thing}, ...: fixed for the whole story) or fresh draws from POOLS,
# where a trailing digit asks for another draw from the same pool ({verbed} and {verbed2}).
OPENING = [
    "Once upon a time, there was a little {kid} named {name}.",
    "Once upon a time, there was a {adj} {kid} named {name}.",
    "There was once a {adj} {kid} called {name}.",
    "{name} was a {adj} {kid} who lived in a {adj2} house near the {place}.",
    "Once upon a time, in a {adj} village, there lived a {kid} named {name}.",
    "One day, a little {kid} named {name} woke up very early.",
]
TRAIT = [
    "{He} loved to play with {his} {look} {thing}.",
    "{He} had a {look} {thing} that {he} loved very much.",
    "{His} favorite toy was a {look} {thing}.",
    "{name} had a pet {pet}. The {pet} was very {adj}.",
]
HABIT = [
    "{He} liked to {verb} in the {place} every day.",
    "Every morning, {name} and {his} {pet} went to the {place} to {verb}.",
    "{name} always wanted to {verb} like the big {animals}.",
    '{name} often said, "My {pet} {verbs} all day, and I {verb} all day too!"',
    "{name} and {friend} {verb} together every day, but {friend} {verbs2} faster.",
    "",
]
EVENT = [
    "One day, {name} went to the {place} with {his} {relative}.",
    "One sunny day, {name} took {his} {thing} to the {place}.",
    "One day, {he} saw a {adj} {animal} near the {place2}.",
    "One morning, {name} and {his} {pet} walked to the {place}.",
    "One day, {name}'s {relative} said, \"Let's go to the {place}!\"",
]
SCENE = [
    "",
    "The sun was shining, and the {animals} were singing.",
    "The sky was blue and the {animals} were playing.",
    "It was a cold and windy day.",
    "There was a {adj} {animal} by the {place2}, and two {animals} were {color}.",
]
LOST = [
    ["{He} played with {his} {thing} all day.", "{He} threw the {thing} up in the sky.", ""],
    ["But then, the {thing} was gone!", "Oh no! The {thing} fell into the {place2}.",
     "Suddenly, {name} could not find {his} {thing}."],
    ["{He} was very sad.", "{name} felt {feeling}.", "{He} started to cry.", "{name} was sad and began to cry."],
    ['{He} said, "Where is my {thing}?"', '"Who took my {thing}?" {he} asked.',
     '{He} asked {his} {relative}, "Can you help me find my {thing}?"'],
    ['{His} {relative} said, "Let\'s find it!"', '{His} {relative} said, "Don\'t worry, we will find it."',
     "{His} {pet} wanted to help.", ""],
    ["They looked and looked.", "They looked everywhere in the {place}.",
     "They looked under the {toy} and behind the {toy2}."],
    ["Then {he} found the {thing}!", "At last, {name} found the {thing} under a big rock!",
     "Then the {pet} ran and found the {thing}.", "Finally, {he} saw the {thing} next to a {adj} {animal}."],
    ["{He} was very happy.", '{name} hugged {his} {thing} and said, "Thank you!"', "{name} was so {feeling}.",
     "{He} smiled and laughed."],
]
FRIEND = [
    ["At the {place}, {he} saw a little {other}.", "{He} saw a {adj} {other} sitting all alone.",
     "At the {place}, {he} met a {adj} {other}."],
    ["The {other} was sad.", "The {other} looked {feeling}.", "The {other} was sad because it had no friends.",
     "The {other} was very shy."],
    ['{name} said, "Hi! Do you want to play with me?"', '"Hello, {other}!" said {name}. "Can we be friends?"',
     '{name} asked, "Why are you sad?"', '{name} said, "Hi! Do you want to {verb} with me?"'],
    ['The {other} said, "Yes!"', 'The {other} said, "Yes! I would love to {verb}!"',
     'The {other} said, "I am lost. I cannot find my mom."', "The {other} nodded and smiled."],
    ["They played together all day.", "They {verbed} and {verbed2} in the {place}.",
     "{name} and the {other} {verbed} by the {place2}.", "The {other} showed {name} how to {verb}."],
    ["They were very happy.", "", "They had so much fun.", "The {other} was not {feeling} anymore."],
    ["{name} and the {other} were friends.", "From that day on, {name} and the {other} were best friends.",
     "They became the best of friends.",
     "Now {name} {verbs} with the {other} every day, and they {verb} in the {place} too."],
]
SHARE = [
    ["{name} had a big {snack}.", "{name} had a {adj} {snack} for lunch.",
     "{His} {relative} gave {him} a {adj} {snack}."],
    ["{friend} saw the {snack} and wanted some too.", "Then {friend} came and looked at the {snack}."],
    ['{friend} said, "Can I have some?"', '{friend} asked, "Can I have some, please?"',
     '"I am so hungry," said {friend}.'],
    ['But {name} said, "No! It is mine!"', "{name} did not want to share.",
     "{name} hid the {snack} behind {his} back."],
    ["{friend} was sad.", "{friend} was sad and walked away.", "{friend} felt {feeling} and started to cry."],
    ["Then {name} felt sad too.", "{name} felt bad.", "{name} thought about it.", "Then {name} felt sorry."],
    ['{He} said, "I am sorry. Let\'s share!"', '{He} ran to {friend} and said, "I am sorry. Let\'s share!"',
     "{He} gave half of the {snack} to {friend}."],
    ["They ate the {snack} together.", "They ate the {snack} together and laughed.",
     '{friend} smiled and said, "Thank you!"'],
    ["{name} learned that sharing is caring.", "{name} learned that it is good to share with friends.", ""],
]
HELP = [
    ["Then {he} heard a {adj} noise.", "{He} heard a {adj} noise coming from a tree.",
     "Suddenly, {he} heard someone crying."],
    ["It was a little {other} in a tree!", "It was a little {other} stuck in the tree!",
     "A little {other} was stuck in the mud.", "A baby {other} could not find its way home."],
    ['The {other} said, "Help me!"', '"Help me!" cried the {other}.',
     'The {other} said, "Please help me! I am scared."'],
    ["{name} wanted to help.", "{name} was brave.", "{name} was scared, but {he} wanted to help."],
    ["{He} ran to get {his} {relative}.", "{He} climbed up slowly and carefully.",
     "{He} got a long stick and reached out."],
    ["Then the {other} was safe.", "Soon the {other} was safe.", "Together, they saved the {other}."],
    ['The {other} said, "Thank you, {name}!"', 'The {other} said, "Thank you, {name}! You are very kind."',
     "The {other} was very {feeling} and thanked {name}."],
    ["{name} was very happy.", "{name} felt proud.", "{name} felt warm inside.",
     '{His} {relative} said, "I am proud of you."'],
]
DISCOVERY = [
    ["In the {place}, {he} found a {found}.", "{He} found a {adj} {found} in the {place}.",
     "{name} saw something {adj} in the grass. It was a {found}!"],
    ['"What is this?" {he} asked.', "{name} was very curious.", "{He} had never seen a {found} like this before."],
    ["{He} picked it up and looked at it.", "{He} touched the {found}, and it began to glow!",
     "When {he} shook it, it made a funny sound."],
    ["{He} showed it to {his} {relative}.", "{He} ran home and showed it to {his} {relative}.",
     "{He} showed the {found} to {friend}."],
    ['{His} {relative} said, "Wow! That is a {adj} {found}!"', '"It is magic!" said {friend}.',
     '"Can I {verb} with it?" asked {friend}.'],
    ["They played with the {found} all day.", "They {verbed} with the {found} all afternoon.",
     "Every day, they {verbed} with it in the {place}."],
    ["It was the best day ever.", "{name} kept the {found} in a safe place."],
]
ENDING = [
    "",
    "The end.",
    "They were happy.",
    "{name} went home and slept well that night.",
    "That night, {name} dreamed about the {place}.",
    "{name} and {his} {relative} went home, tired but happy.",
    "And they all lived happily ever after.",
]
PLOTS = [LOST, FRIEND, SHARE, HELP, DISCOVERY]


class _Slots(dict):
    """The story's cast; any other slot is a fresh draw from its pool."""

    def __init__(self, cast: dict[str, str], draw):
        super().__init__(cast)
        self.draw = draw

    def __missing__(self, slot: str) -> str:
        return self.draw(slot.rstrip("0123456789"))


def _story(rng: random.Random) -> str:
    def draw(pool: str) -> str:
        return zipf_choice(rng, POOLS[pool])

    gender = rng.choice(["girl", "boy"])
    he, his, him = ("she", "her", "her") if gender == "girl" else ("he", "his", "him")
    name = draw(gender)
    friend = name
    while friend == name:
        friend = draw(rng.choice(["girl", "boy"]))
    cast = {
        "name": name, "kid": gender if rng.random() < 0.7 else draw("animal"), "friend": friend,
        "he": he, "He": he.capitalize(), "his": his, "His": his.capitalize(), "him": him,
        "pet": draw("animal"), "other": draw("animal"), "thing": draw("toy"), "found": draw("toy"),
        "snack": draw("food"), "look": draw(rng.choice(["adj", "color"])), "place": draw("place"),
        "relative": draw("relative"),
    }
    steps = [OPENING, TRAIT, HABIT, EVENT, SCENE, *rng.choice(PLOTS), ENDING]
    text = " ".join(filter(None, (zipf_choice(rng, step).format_map(_Slots(cast, draw)) for step in steps)))
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)  # "a owl" -> "an owl"


def generate_stories(n_stories: int, seed: int) -> Iterator[str]:
    """`n_stories` TinyStories-like stories, the same for a seed (and the first m of n are those of m)."""
    rng = random.Random(seed)
    for _ in range(n_stories):
        yield _story(rng)


# ----------------------------------------------------------------------------- real corpora

END_OF_TEXT = "<|endoftext|>"  # the separator between stories in TinyStories' .txt files
HUB_NAME = re.compile(r"[\w-][\w.-]*(/[\w-][\w.-]*)?")  # "name" or "owner/name"


def load_stories(
    source: str, split: str, cache_dir: str | None = None, text_field: str = "text", limit: int | None = None
) -> Iterator[str]:
    """Stream the stories of `source`, at most `limit` of them.

    `source` is a local path: a directory written by save_to_disk (a DatasetDict gives its `split`; a single
    Dataset is used whatever `split` says), a .json/.jsonl file or a TinyStories .txt file (stories separated
    by lines containing <|endoftext|>, or by blank lines when there are none); `split` does not apply to files,
    nor `text_field` to .txt. Anything else is a Hugging Face dataset name, streamed. A missing path or split
    raises here; a missing text field at the first story.
    """
    import datasets  # here, not at the top: importing it takes a second that the embedded corpus does not need

    path = Path(source).expanduser()
    # A path that does not exist is still local if no hub name looks like it: a typo fails as a missing file
    if path.exists() or path.suffix in (".json", ".jsonl", ".txt") or not HUB_NAME.fullmatch(source):
        stories = _local_stories(path, split, text_field)
    else:
        rows = datasets.load_dataset(source, split=split, cache_dir=cache_dir, streaming=True)
        stories = _texts(rows, text_field, source)
    return itertools.islice(stories, limit)


def _local_stories(path: Path, split: str, text_field: str) -> Iterator[str]:
    import datasets

    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_dir():
        try:
            data = datasets.load_from_disk(str(path))
        except FileNotFoundError:  # raised without a file name: not a save_to_disk folder
            raise InputError(f"{path}: not a Hugging Face dataset folder (datasets' save_to_disk)") from None
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise InputError(f"split {split!r} not found in {path}; available splits: {', '.join(data)}")
            data = data[split]
        return _texts(data, text_field, str(path))
    if path.suffix in (".json", ".jsonl"):
        rows = datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)
        return _texts(rows, text_field, str(path))
    if path.suffix == ".txt":
        return _txt_stories(path)
    raise InputError(f"{path}: unsupported file type; expected a save_to_disk directory, .json, .jsonl or .txt")


def _texts(rows: Iterable[dict], text_field: str, source: str) -> Iterator[str]:
    for row in rows:
        if text_field not in row:
            raise InputError(f"{source} has no field {text_field!r}; columns: {', '.join(row)}")
        yield row[text_field]


def _txt_stories(path: Path) -> Iterator[str]:
    """The stories of a TinyStories .txt file; a byte that is not UTF-8 is an InputError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            has_marker = any(END_OF_TEXT in line for line in f)  # stops at the first one, near the top
        last_separator = END_OF_TEXT if has_marker else "\n"  # after the last line: the last story ends too
        story = []
        with open(path, encoding="utf-8") as f:
            for line in itertools.chain(f, [last_separator]):
                story.append(line.replace(END_OF_TEXT, ""))
                if (END_OF_TEXT in line) if has_marker else not line.strip():
                    if text := "".join(story).strip():
                        yield text
                    story = []
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start} of a line)") from None
