"""Our own word lists for the RULER-style suite: needle keys, prose filler and common-words lists.

Plain common English words, written for this project. Each list holds distinct lowercase words.
"""

from __future__ import annotations

ADJECTIVES = tuple("""
able angry ancient bitter black bold brave bright brisk broad broken brown busy calm careful cheap clean
clever cold cool crisp cruel curly damp dark deep dense dim dirty dry dull dusty eager early easy empty
faint fair famous fancy fast fierce firm flat fluffy foggy fond fresh friendly frozen full gentle giant
glad golden good grand gray great green grim happy hard harsh heavy high hollow honest hot huge
humble hungry icy idle jolly keen kind large late lazy lean light little lively lone long loose loud low
loyal lucky mad mellow merry mild misty modest narrow neat new nice noble noisy odd old orange pale plain
polite poor proud pure purple quick quiet rapid rare raw red rich ripe rough round royal rude rusty sad
safe salty sandy scarlet sharp shiny short shy silent silver simple slim slow small smart smooth soft
solid sour spare stark steady steep sticky stiff still stormy strange strict strong sturdy sunny swift
tall tame tender thick thin tidy tiny tired tough true vast velvet violet warm wary weak wet white wide
wild windy wise wooden young
""".split())

NOUNS = tuple("""
acorn actor anchor angel ankle apple apron arrow artist attic aunt author autumn badge bakery balloon
banana band banner barn barrel basket bat beach beacon beak bean bear beard bed bee beetle bell belt
bench berry bicycle bird biscuit blanket blossom boat bone book boot bottle boulder bowl box bracelet
branch bread breeze brick bridge brook broom brother bucket buffalo bug builder bull bundle butter button
cabin cable cactus cake camel camera camp candle canoe canyon cap captain car card carpet carrot cart
castle cat cattle cave cellar chain chair chalk cheese cherry chest chicken chimney church circle city
cliff clock cloud clover coach coast coat coin collar comet compass cook copper cord corn corner cottage
cotton county cousin cow crab cradle crane crayon creek crow crown cup curtain cushion daisy dancer desert
desk diamond dinner doctor dog doll dolphin donkey door dragon drawer dream dress drum duck dune eagle
earth elbow elephant elm engine envelope fabric falcon farm farmer feather fence fern ferry field finger
fire fish flag flame flock flower flute fog forest fork fossil fountain fox frog fruit garden garlic gate
giraffe glass glove goat gold goose grape grass guitar hammer harbor harp hat hawk hay heart hedge helmet
hen hill honey hook horn horse hotel house island ivory jacket jar jelly jewel judge jungle kettle key
kitchen kite knee knife ladder lake lamp lantern leaf lemon letter library lily lion lizard lock lodge
magnet mango map maple marble market meadow melon mill miller mirror mole monkey moon moose moss moth
mountain mouse mug museum nail needle nest net nurse oak oar ocean olive onion orchard otter owl ox
paddle page pail painter palace pan panda paper parrot pasture peach peanut pear pebble pen pencil pepper
piano pickle pie pig pigeon pillow pilot pine pipe planet plate plum pocket poet pond pony porch pot
potato pumpkin puppet quill rabbit raft rail rain rainbow raven ribbon rice ring river road robin rock
rocket roof room rope rose ruby sail sailor salmon salt sand saucer scarf school scissors sea seal seed
shadow sheep shell shepherd ship shirt shoe shop shovel silk singer sister skate sky sled slipper snail
snake sock soldier soup spider spoon spring squirrel stable star statue steam stone stool storm stove
straw stream street string sugar summer sun swan sweater table tailor teacher teapot tent thread throne
tiger timber toad tomato tooth torch tower town toy tractor trail train tree trumpet tulip tunnel turkey
turtle umbrella valley vase violin wagon wall walnut wand watch water wave weaver whale wheat wheel whistle
willow window wing winter wizard wolf worm yarn zebra
""".split())

VERBS_PAST = tuple("""
admired avoided borrowed built buried carried chased cleaned climbed collected counted covered crossed
discovered drew fed fixed followed found gathered guarded held hid lifted mended moved noticed opened
painted passed picked planted polished pulled pushed raised reached repaired saw shared showed sketched
studied swept touched tracked visited washed watched weighed welcomed wrapped
""".split())

PLACES = (
    "near the old bridge", "by the river", "at the edge of the forest", "behind the barn", "on the hill",
    "in the market square", "beside the lake", "under the tall trees", "along the coast", "in the quiet village",
    "at the end of the road", "inside the cottage", "across the valley", "next to the mill", "by the harbor",
    "in the garden", "near the school", "on the far shore", "beyond the meadow", "in the town hall",
)

TIMES = (
    "before dawn", "in the morning", "at noon", "after lunch", "in the afternoon", "at dusk", "late at night",
    "on a rainy day", "last spring", "during the winter", "one summer evening", "early on Sunday",
)
