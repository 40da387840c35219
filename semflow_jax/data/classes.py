"""Class tables of the published datasets: names, display palettes and raw-id -> train-id lookup tables.

A lookup table is uint8 [256]: `lut[raw_mask]` turns a mask as stored on disk into train ids 0..C-1, with
255 (ignore) for everything the benchmark does not score. Palettes are uint8 [C, 3] display colours (the
official ones where a dataset publishes them), unrelated to the flow's anchor colours.
"""

from __future__ import annotations

import numpy as np

IGNORE = 255


def voc_palette(n: int) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved RGB): n distinct display colours, class 0 black."""
    out = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


def lut_from_pairs(pairs) -> np.ndarray:
    """uint8 [256] mapping each raw id of (raw, train) pairs to its train id, every other value to 255."""
    lut = np.full(256, IGNORE, np.uint8)
    for raw, train in pairs:
        lut[raw] = train
    return lut


# --- COCO-Stuff-164k -----------------------------------------------------------------------------------
# stuffthingmaps_trainval2017 stores label id - 1 (0..181) and 255 for unlabeled. Eleven of the 91 COCO
# thing ids were never annotated; the remaining 80 things + 91 stuff classes are the 171 scored classes.
COCO_RAW_NAMES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant street_sign "
    "stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe hat backpack "
    "umbrella shoe eye_glasses handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat "
    "baseball_glove skateboard surfboard tennis_racket bottle plate wine_glass cup fork knife spoon bowl "
    "banana apple sandwich orange broccoli carrot hot_dog pizza donut cake chair couch potted_plant bed "
    "mirror dining_table window desk toilet door tv laptop mouse remote keyboard cell_phone microwave oven "
    "toaster sink refrigerator blender book clock vase scissors teddy_bear hair_drier toothbrush hair_brush "
    "banner blanket branch bridge building-other bush cabinet cage cardboard carpet ceiling-other "
    "ceiling-tile cloth clothes clouds counter cupboard curtain desk-stuff dirt door-stuff fence "
    "floor-marble floor-other floor-stone floor-tile floor-wood flower fog food-other fruit furniture-other "
    "grass gravel ground-other hill house leaves light mat metal mirror-stuff moss mountain mud napkin net "
    "paper pavement pillow plant-other plastic platform playingfield railing railroad river road rock roof "
    "rug salad sand sea shelf sky-other skyscraper snow solid-other stairs stone straw structural-other "
    "table tent textile-other towel tree vegetable wall-brick wall-concrete wall-other wall-panel "
    "wall-stone wall-tile wall-wood water-other waterdrops window-blind window-other wood"
).split()
COCO_UNUSED_RAW = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)  # street sign, hat, shoe, eye glasses, ...
_coco_used = [i for i in range(len(COCO_RAW_NAMES)) if i not in COCO_UNUSED_RAW]
COCO_NAMES = tuple(COCO_RAW_NAMES[i].replace("_", " ") for i in _coco_used)
COCO_LUT = lut_from_pairs((raw, train) for train, raw in enumerate(_coco_used))
COCO_PALETTE = voc_palette(len(COCO_NAMES))

# --- Cityscapes --------------------------------------------------------------------------------------------
# (labelId, trainId, name, colour) of the 19 scored classes in the official cityscapesScripts label table;
# every other labelId (unlabeled, ego vehicle, ..., license plate) is ignored.
CITYSCAPES_TABLE = (
    (7, 0, "road", (128, 64, 128)),
    (8, 1, "sidewalk", (244, 35, 232)),
    (11, 2, "building", (70, 70, 70)),
    (12, 3, "wall", (102, 102, 156)),
    (13, 4, "fence", (190, 153, 153)),
    (17, 5, "pole", (153, 153, 153)),
    (19, 6, "traffic light", (250, 170, 30)),
    (20, 7, "traffic sign", (220, 220, 0)),
    (21, 8, "vegetation", (107, 142, 35)),
    (22, 9, "terrain", (152, 251, 152)),
    (23, 10, "sky", (70, 130, 180)),
    (24, 11, "person", (220, 20, 60)),
    (25, 12, "rider", (255, 0, 0)),
    (26, 13, "car", (0, 0, 142)),
    (27, 14, "truck", (0, 0, 70)),
    (28, 15, "bus", (0, 60, 100)),
    (31, 16, "train", (0, 80, 100)),
    (32, 17, "motorcycle", (0, 0, 230)),
    (33, 18, "bicycle", (119, 11, 32)),
)
CITYSCAPES_NAMES = tuple(row[2] for row in CITYSCAPES_TABLE)
CITYSCAPES_LUT = lut_from_pairs((row[0], row[1]) for row in CITYSCAPES_TABLE)
CITYSCAPES_PALETTE = np.array([row[3] for row in CITYSCAPES_TABLE], np.uint8)

# --- CelebAMask-HQ -------------------------------------------------------------------------------------------
# The official part order (the dataset's g_mask.py): a part later in the list is painted over earlier ones.
CELEBAMASK_PARTS = (
    "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
    "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
)  # fmt: skip
CELEBAMASK_NAMES = ("background",) + CELEBAMASK_PARTS  # class i + 1 is part i
CELEBAMASK_PALETTE = voc_palette(len(CELEBAMASK_NAMES))

# --- ADE20K SceneParsing (ADEChallengeData2016) ------------------------------------------------------------
# Annotations store 0 for "other" (ignored) and 1..150 for the classes.
ADE20K_NAMES = tuple(
    x.replace("_", " ")
    for x in (
        "wall building sky floor tree ceiling road bed windowpane grass cabinet sidewalk person earth door "
        "table mountain plant curtain chair car water painting sofa shelf house sea mirror rug field armchair "
        "seat fence desk rock wardrobe lamp bathtub railing cushion base box column signboard "
        "chest_of_drawers counter sand sink skyscraper fireplace refrigerator grandstand path stairs runway "
        "case pool_table pillow screen_door stairway river bridge bookcase blind coffee_table toilet flower "
        "book hill bench countertop stove palm kitchen_island computer swivel_chair boat bar arcade_machine "
        "hovel bus towel light truck tower chandelier awning streetlight booth television_receiver airplane "
        "dirt_track apparel pole land bannister escalator ottoman bottle buffet poster stage van ship "
        "fountain conveyer_belt canopy washer plaything swimming_pool stool barrel basket waterfall tent bag "
        "minibike cradle oven ball food step tank trade_name microwave pot animal bicycle lake dishwasher "
        "screen blanket sculpture hood sconce vase traffic_light tray ashcan fan pier crt_screen plate "
        "monitor bulletin_board shower radiator glass clock flag"
    ).split()
)
ADE20K_LUT = lut_from_pairs((raw, raw - 1) for raw in range(1, 151))
ADE20K_PALETTE = voc_palette(len(ADE20K_NAMES))

assert len(COCO_RAW_NAMES) == 182 and len(COCO_NAMES) == 171
assert len(CELEBAMASK_NAMES) == 19 and len(ADE20K_NAMES) == 150
