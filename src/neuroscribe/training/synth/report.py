"""Radiology reports written from a synthetic study's ground truth.

:func:`write_report` turns the findings into a "Findings:" section (one line per topic, in the
order of :data:`report_template`) and an "Impression:" section (numbered diagnoses, most urgent
first, or a normal impression). Wording varies between reports: each report draws a writing style
(US or UK spelling, preferred synonyms) and a sentence pattern per statement from the study's own
random generator, so it is deterministic per (seed, study index). Degree words, laterality,
location and measurements follow the ground truth; pertinent negatives are stated for whatever
is absent. The vocabulary follows the FORTE brain keyword list (degree, landmark, feature and
impression terms).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from neuroscribe.training.synth.findings import (
    Acuity,
    Degree,
    Finding,
    FindingKind,
    Region,
    Side,
)

__all__ = ["report_template", "write_report"]

#: The site's report skeleton: the topics of the Findings section in order, then the Impression.
#: Generated reports follow it; the model's template prompt shows it.
report_template = """Findings:
[Extra-axial spaces: subdural, epidural or subarachnoid blood and its side, site and thickness; \
or no extra-axial collection.]
[Brain parenchyma: hemorrhage, infarcts (territory, age), white matter, calcifications; or no \
intracranial hemorrhage and preserved grey-white differentiation.]
[Ventricles and sulci: size, hydrocephalus or atrophy; or normal in size.]
[Midline: mass effect and midline shift in mm and its direction; or no midline shift.]
[Skull, paranasal sinuses and mastoid air cells.]
Impression:
[Numbered diagnoses, most urgent first; or: No acute intracranial abnormality.]"""


@dataclass(frozen=True)
class _Style:
    """One radiologist's habits for a report."""

    uk: bool
    hypodensity: str
    hyperdense: str
    numbered: bool

    def hypodense(self) -> str:
        """The adjective that goes with the preferred hypodensity noun."""
        return {"hypodensity": "hypodense", "low density": "low-density",
                "hypoattenuation": "hypoattenuating"}[self.hypodensity]

    def hem(self) -> str:
        return "haemorrhage" if self.uk else "hemorrhage"

    def hema(self) -> str:
        return "haematoma" if self.uk else "hematoma"

    def edema(self) -> str:
        return "oedema" if self.uk else "edema"

    def grey(self) -> str:
        return "grey" if self.uk else "gray"

    def centred(self) -> str:
        return "centred" if self.uk else "centered"


class _Writer:
    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.style = _Style(
            uk=bool(rng.random() < 0.35),
            hypodensity=self.pick(["hypodensity", "low density", "hypoattenuation"]),
            hyperdense=self.pick(["hyperdense", "high-density", "high attenuation"]),
            numbered=bool(rng.random() < 0.75),
        )

    def pick(self, options: Sequence[str]) -> str:
        return options[int(self.rng.integers(len(options)))]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)


def _article(word: str) -> str:
    """'an' before a vowel sound (including numbers spoken with one: 8, 11, 18, 80...)."""
    spoken_vowel = word[:1] in "aeiou8" or word in ("11", "18") or (word[:2] == "18" and len(word) == 2)
    return "an" if spoken_vowel else "a"


def _mm(value: float | None) -> str:
    return f"{value:.0f}" if value is not None else "?"


def _bulk(size: float | None, small: float, large: float) -> str:
    """'small ' or 'large ' (with the space) by size, else ''."""
    if size is None:
        return ""
    return "small " if size <= small else "large " if size >= large else ""


def _size_phrase(w: _Writer, size: float | None, what: str = "") -> str:
    if size is None:
        return ""
    if size >= 20 and w.chance(0.3):
        cm = f"{size / 10:.1f} cm"
        return w.pick([f"measuring about {cm}{what}", f"approximately {cm}{what}"])
    return w.pick([f"measuring about {_mm(size)} mm{what}", f"measuring approximately {_mm(size)} mm{what}",
                   f"about {_mm(size)} mm{what}"])


_LOBE_WORDS = {
    Region.FRONTAL: "frontal lobe",
    Region.PARIETAL: "parietal lobe",
    Region.TEMPORAL: "temporal lobe",
    Region.OCCIPITAL: "occipital lobe",
    Region.BASAL_GANGLIA: "basal ganglia",
    Region.INTERNAL_CAPSULE: "internal capsule",
    Region.THALAMUS: "thalamus",
    Region.CORONA_RADIATA: "corona radiata",
    Region.CEREBELLUM: "cerebellar hemisphere",
}
_CONVEXITY_WORDS = {
    Region.FRONTAL: "frontal",
    Region.PARIETAL: "parietal",
    Region.TEMPORAL: "temporal",
    Region.OCCIPITAL: "occipital",
    Region.FRONTOPARIETAL: "frontoparietal",
    Region.FRONTOTEMPORAL: "frontotemporal",
    Region.TEMPOROPARIETAL: "temporoparietal",
    Region.FRONTOTEMPOROPARIETAL: "frontotemporoparietal",
}
_TERRITORY = {
    Region.MCA_TERRITORY: ("middle cerebral artery", "MCA",
                           ("frontal and temporal lobes and insula",
                            "lateral frontal, parietal and temporal lobes",
                            "frontoparietal cortex and insula")),
    Region.ACA_TERRITORY: ("anterior cerebral artery", "ACA",
                           ("medial frontal lobe", "parasagittal frontal lobe and anterior corpus callosum")),
    Region.PCA_TERRITORY: ("posterior cerebral artery", "PCA",
                           ("occipital lobe", "occipital lobe and medial temporal lobe")),
}
_DEGREE_ADVERB = {Degree.MILD: "mildly", Degree.MODERATE: "moderately", Degree.MARKED: "markedly"}


def _degree(w: _Writer, degree: Degree | None) -> str:
    if degree is Degree.MARKED:
        return w.pick(["marked", "severe"])
    return (degree or Degree.MILD).value


def _side_word(side: Side) -> str:
    return side.value if side in (Side.LEFT, Side.RIGHT) else "bilateral"


# --- one finding, two ways ------------------------------------------------------------------------


def _hemorrhage(w: _Writer, f: Finding) -> tuple[str, str]:
    s = w.style
    loc = f"{f.side.value} {_LOBE_WORDS[f.region]}"
    acute = f.acuity is Acuity.ACUTE
    age = "acute" if acute else "subacute"
    vol = f" (estimated volume {f.volume_ml:.0f} mL)" if f.volume_ml and w.chance(0.6) else ""
    size = _size_phrase(w, f.size_mm)
    rim = (w.pick([f"a thin rim of perifocal {s.edema()}", f"mild surrounding {s.edema()}"]) if acute
           else w.pick([f"moderate perifocal {s.edema()}",
                        f"surrounding {s.hypodensity} in keeping with {s.edema()}"]))
    bulk = _bulk(f.size_mm, 20, 40)
    article = "a" if bulk or not acute else "an"
    finding = w.pick([
        f"There is {article} {bulk}{age} intraparenchymal {s.hem()} in the {loc}, {size}{vol}, "
        f"with {rim}.",
        f"{age.capitalize()} {s.hyperdense} {s.hema()} {s.centred()} in the {loc}, {size}{vol}, with {rim}.",
        f"A {bulk}{s.hyperdense} {age} intracerebral {s.hem()} is seen in the {loc}, {size}{vol}. "
        f"There is {rim}.",
    ])
    kind = w.pick([f"intraparenchymal {s.hem()}", f"intracerebral {s.hem()}", f"intracerebral {s.hema()}",
                   f"intracerebral {s.hem()} (ICH)"])
    impression = f"{age.capitalize()} {loc} {kind}"
    if f.volume_ml and w.chance(0.5):
        impression += f", about {f.volume_ml:.0f} mL"
    return finding, impression


def _subdural(w: _Writer, f: Finding) -> tuple[str, str]:
    s = w.style
    where = _CONVEXITY_WORDS.get(f.region, f.region.value)
    t = _mm(f.size_mm)
    bilateral = f.side is Side.BILATERAL
    side = "bilateral" if bilateral else f.side.value
    convexity = "convexities" if bilateral else "convexity"
    plural = "s" if bilateral else ""
    bulk = _bulk(f.size_mm, 5, 15)
    if f.acuity is Acuity.ACUTE:
        finding = w.pick([
            f"There is {'a ' + bulk if bulk else 'an '}acute {s.hyperdense} subdural {s.hema()}{plural} "
            f"along the {side} {where} {convexity}, measuring up to {t} mm in thickness.",
            f"Crescentic {s.hyperdense} extra-axial collection{plural} over the {side} {where} {convexity}, "
            f"consistent with acute subdural {s.hema()}{plural}, maximal thickness {t} mm.",
            f"Acute {side} {where} subdural {s.hema()}{plural}, {t} mm thick, along the inner table.",
        ])
        impression = w.pick([f"Acute {side} {where} subdural {s.hema()}{plural}, {t} mm in thickness",
                             f"Acute {side} {where} SDH, {t} mm in thickness"])
    elif f.acuity is Acuity.SUBACUTE:
        finding = w.pick([
            f"Subacute, near-isodense subdural {s.hema()}{plural} over the {side} {where} {convexity}, "
            f"measuring up to {t} mm in thickness.",
            f"There is a subacute subdural collection{plural} along the {side} {where} {convexity}, "
            f"about {t} mm thick, nearly isodense to the cortex.",
        ])
        impression = f"Subacute {side} {where} subdural {s.hema()}{plural} ({t} mm)"
    else:
        finding = w.pick([
            f"{(bulk or 'crescentic ').capitalize()}{s.hypodense()} chronic subdural {s.hema()}{plural} over "
            f"the {side} {where} {convexity}, measuring up to {t} mm in thickness.",
            f"There is a chronic subdural collection{plural} of low density along the {side} {where} "
            f"{convexity}, maximal thickness {t} mm.",
            f"Chronic {side} {where} subdural {s.hema()}{plural}, hypodense, up to {t} mm thick.",
        ])
        impression = f"Chronic {side} {where} subdural {s.hema()}{plural}, {t} mm"
    return finding, impression


def _epidural(w: _Writer, f: Finding) -> tuple[str, str]:
    s = w.style
    where = _CONVEXITY_WORDS.get(f.region, f.region.value)
    t = _mm(f.size_mm)
    finding = w.pick([
        f"Biconvex {s.hyperdense} extra-axial collection in the {f.side.value} {where} region, "
        f"consistent with an acute epidural {s.hema()}, measuring {t} mm in thickness.",
        f"There is a lentiform {s.hyperdense} acute epidural {s.hema()} over the {f.side.value} {where} "
        f"convexity, up to {t} mm thick.",
    ])
    impression = w.pick([f"Acute {f.side.value} {where} epidural {s.hema()}, {t} mm",
                         f"Acute {f.side.value} {where} epidural {s.hema()} (EDH), {t} mm thick"])
    return finding, impression


def _subarachnoid(w: _Writer, f: Finding) -> tuple[str, str]:
    s = w.style
    if f.region is Region.CONVEXITY:
        finding = w.pick([
            f"{s.hyperdense.capitalize()} blood is seen in the sulci over the {f.side.value} cerebral "
            f"convexity, in keeping with subarachnoid {s.hem()}.",
            f"Small volume subarachnoid {s.hem()} in the {f.side.value} convexity sulci.",
        ])
        impression = f"Acute subarachnoid {s.hem()} over the {f.side.value} convexity"
    elif f.region is Region.SYLVIAN_FISSURE:
        finding = w.pick([
            f"Subarachnoid {s.hem()} in the {f.side.value} sylvian fissure.",
            f"{s.hyperdense.capitalize()} subarachnoid blood fills the {f.side.value} sylvian fissure.",
        ])
        impression = f"Acute subarachnoid {s.hem()} in the {f.side.value} sylvian fissure"
    elif f.region is Region.BASAL_CISTERNS:
        finding = w.pick([
            f"Diffuse {s.hyperdense} subarachnoid blood fills the basal cisterns and both sylvian fissures.",
            f"Subarachnoid {s.hem()} in the suprasellar and perimesencephalic cisterns, extending into "
            f"the sylvian fissures.",
        ])
        impression = f"Acute subarachnoid {s.hem()} in the basal cisterns"
    else:
        finding = w.pick([
            f"Extensive subarachnoid {s.hem()} in the basal cisterns, sylvian fissures and cerebral "
            f"sulci bilaterally.",
            f"Diffuse {s.hyperdense} subarachnoid blood throughout the basal cisterns and the sulci of "
            f"both hemispheres.",
        ])
        impression = f"Diffuse acute subarachnoid {s.hem()}"
    return finding, impression


def _territory_words(w: _Writer, f: Finding) -> tuple[str, str, str]:
    long, short, lobes = _TERRITORY[f.region]
    name = w.pick([f"{long} ({short}) territory", f"{short} territory", f"{long} territory"])
    return name, short, w.pick(list(lobes))


def _acute_infarct(w: _Writer, f: Finding) -> tuple[str, str]:
    s = w.style
    name, short, lobes = _territory_words(w, f)
    side = f.side.value
    size = _size_phrase(w, f.size_mm)
    finding = w.pick([
        f"Subtle {s.hypodensity} with loss of {s.grey()}-white matter differentiation in the {side} {name}, "
        f"involving the {lobes}, {size}, with effacement of the overlying sulci, consistent with an "
        f"acute infarct.",
        f"There is an area of {s.hypodensity} and loss of {s.grey()}-white differentiation in the {side} "
        f"{lobes} ({side} {short} territory) with local sulcal effacement, in keeping with an acute "
        f"ischemic infarct.",
        f"Acute territorial infarct in the {side} {name}: ill-defined {s.hypodensity}, {size}, with loss "
        f"of the {s.grey()}-white matter junction and swelling of the gyri.",
    ])
    impression = w.pick([f"Acute {side} {short} territory infarct",
                         f"Acute ischemic infarct in the {side} {name}"])
    return finding, impression


def _old_infarct(w: _Writer, f: Finding) -> tuple[str, str]:
    name, short, lobes = _territory_words(w, f)
    side = f.side.value
    finding = w.pick([
        f"Well-defined CSF-density area of encephalomalacia in the {side} {name}, involving the {lobes}, "
        f"with ex vacuo dilatation of the adjacent {side} lateral ventricle, in keeping with an old infarct.",
        f"Old {side} {short} territory infarct with encephalomalacia and local volume loss, the adjacent "
        f"sulci and {side} lateral ventricle being enlarged.",
        f"There is a chronic infarct in the {side} {lobes} ({short} territory): encephalomalacia of CSF "
        f"density with widening of the adjacent sulci.",
    ])
    impression = w.pick([f"Old {side} {short} territory infarct", f"Chronic {side} {name} infarct"])
    return finding, impression


def _lacune(w: _Writer, f: Finding) -> tuple[str, str]:
    s = w.style
    loc = f"{f.side.value} {_LOBE_WORDS[f.region]}"
    size = _mm(f.size_mm)
    if f.acuity is Acuity.ACUTE:
        finding = w.pick([
            f"Small ill-defined {s.hypodensity} in the {loc}, {size} mm, possibly an acute lacunar infarct.",
            f"{_article(size).capitalize()} {size} mm subtle {s.hypodensity} in the {loc} may represent "
            f"an acute lacunar infarct.",
        ])
        impression = f"Possible acute lacunar infarct in the {loc}"
    else:
        finding = w.pick([
            f"{_article(size).capitalize()} {size} mm old lacunar infarct in the {loc}.",
            f"Small well-defined CSF-density focus in the {loc}, {size} mm, in keeping with a chronic "
            f"lacunar infarct.",
            f"Old lacunar infarct in the {loc}, measuring {size} mm.",
        ])
        impression = f"Old lacunar infarct in the {loc}"
    return finding, impression


def _white_matter(w: _Writer, f: Finding) -> tuple[str, str]:
    s = w.style
    degree = _degree(w, f.degree)
    if f.degree is Degree.MILD:
        finding = w.pick([
            f"Mild patchy periventricular white matter {s.hypodensity}, consistent with small vessel "
            f"ischemic disease.",
            f"Minimal nonspecific {s.hypodensity} in the periventricular white matter, likely chronic "
            f"small vessel ischemic change.",
        ])
    else:
        extent = "confluent periventricular and deep white matter" if f.degree is Degree.MARKED else \
            "periventricular white matter"
        finding = w.pick([
            f"{degree.capitalize()} {s.hypodensity} in the {extent}, compatible with chronic small vessel "
            f"ischemic disease.",
            f"There are {degree} {s.hypodense()} patches in the {extent} without mass effect, in keeping "
            f"with small vessel disease (angiopathic leukoencephalopathy).",
        ])
    impression = w.pick([f"{degree.capitalize()} chronic small vessel ischemic changes",
                         f"{degree.capitalize()} periventricular white matter small vessel disease",
                         f"{degree.capitalize()} angiopathic leukoencephalopathy"])
    return finding, impression


def _atrophy(w: _Writer, f: Finding) -> tuple[str, str]:
    degree = _degree(w, f.degree)
    finding = w.pick([
        f"{degree.capitalize()} generalized prominence of the cerebral sulci, sylvian fissures and "
        f"ventricles, in keeping with {degree} global cerebral volume loss.",
        f"{degree.capitalize()} diffuse brain atrophy with enlargement of the cortical sulci, cerebellar "
        f"fissures and ventricular system.",
        f"The sulci and ventricles are {_DEGREE_ADVERB[f.degree or Degree.MILD]} enlarged in proportion, "
        f"consistent with {degree} generalized atrophy.",
    ])
    impression = w.pick([f"{degree.capitalize()} generalized brain atrophy",
                         f"{degree.capitalize()} global cerebral volume loss"])
    return finding, impression


def _hydrocephalus(w: _Writer, f: Finding) -> tuple[str, str]:
    s = w.style
    adverb = _DEGREE_ADVERB[f.degree or Degree.MILD]
    evans = f" (Evans index about {f.evans_index:.2f})" if f.evans_index and w.chance(0.6) else ""
    finding = w.pick([
        f"The lateral and third ventricles are {adverb} dilated{evans}, with rounded frontal horns and "
        f"enlarged temporal horns, out of proportion to the sulci, which are effaced.",
        f"{_degree(w, f.degree).capitalize()} enlargement of the lateral, third and fourth ventricles{evans} "
        f"without corresponding sulcal widening, in keeping with hydrocephalus.",
    ])
    if f.acuity is Acuity.ACUTE:
        finding += " " + w.pick([
            f"Periventricular {s.hypodensity} suggests transependymal CSF flow.",
            f"There is periventricular low density in keeping with transependymal {s.edema()}.",
        ])
    impression = f"{_degree(w, f.degree).capitalize()} hydrocephalus"
    if f.acuity is Acuity.ACUTE:
        impression += " with transependymal " + s.edema()
    return finding, impression


def _calcification(w: _Writer, f: Finding) -> str:
    if f.region is Region.PINEAL:
        return w.pick(["Physiological calcification of the pineal gland.", "Calcified pineal gland."])
    if f.region is Region.CHOROID_PLEXUS:
        where = ("both lateral ventricles" if f.side is Side.BILATERAL
                 else f"the {f.side.value} lateral ventricle")
        return w.pick([f"Calcification of the choroid plexus in {where}.",
                       f"Physiological choroid plexus calcification in {where}."])
    side = "bilateral" if f.side is Side.BILATERAL else f.side.value
    return w.pick([f"Small calcifications in the {side} basal ganglia (globus pallidus).",
                   f"Punctate {side} basal ganglia calcification, likely physiological."])


def _shift(w: _Writer, f: Finding, lesion_side: Side) -> tuple[str, str]:
    mm = f"{f.size_mm:g}"
    toward = f.side.value
    ventricle = f"the {lesion_side.value} lateral ventricle" if lesion_side.sign else "the lateral ventricles"
    sulci = f"{lesion_side.value} cerebral sulci" if lesion_side.sign else "cerebral sulci"
    finding = w.pick([
        f"Mass effect with effacement of the {sulci} and compression of {ventricle}, with midline shift "
        f"of {mm} mm to the {toward}.",
        f"There is {mm} mm of {'rightward' if toward == 'right' else 'leftward'} midline shift with "
        f"compression of {ventricle}.",
        f"The midline is shifted {mm} mm to the {toward} (subfalcine), with mass effect on {ventricle}.",
    ])
    if f.size_mm and f.size_mm >= 10:
        finding += " " + w.pick(["Early subfalcine herniation.", "Findings suggest subfalcine herniation."])
    impression = w.pick([f"mass effect and {mm} mm midline shift to the {toward}",
                         f"{mm} mm midline shift to the {toward}"])
    return finding, impression


# --- the report --------------------------------------------------------------------------------

_URGENCY = {
    FindingKind.EPIDURAL_HEMATOMA: 0,
    FindingKind.SUBDURAL_HEMATOMA: 1,
    FindingKind.INTRAPARENCHYMAL_HEMORRHAGE: 2,
    FindingKind.SUBARACHNOID_HEMORRHAGE: 3,
    FindingKind.ACUTE_INFARCT: 4,
    FindingKind.HYDROCEPHALUS: 5,
    FindingKind.OLD_INFARCT: 6,
    FindingKind.LACUNAR_INFARCT: 7,
    FindingKind.WHITE_MATTER_HYPODENSITY: 8,
    FindingKind.ATROPHY: 9,
}
_WRITERS = {
    FindingKind.INTRAPARENCHYMAL_HEMORRHAGE: _hemorrhage,
    FindingKind.SUBDURAL_HEMATOMA: _subdural,
    FindingKind.EPIDURAL_HEMATOMA: _epidural,
    FindingKind.SUBARACHNOID_HEMORRHAGE: _subarachnoid,
    FindingKind.ACUTE_INFARCT: _acute_infarct,
    FindingKind.OLD_INFARCT: _old_infarct,
    FindingKind.LACUNAR_INFARCT: _lacune,
    FindingKind.WHITE_MATTER_HYPODENSITY: _white_matter,
    FindingKind.ATROPHY: _atrophy,
    FindingKind.HYDROCEPHALUS: _hydrocephalus,
}
_EXTRA_AXIAL_TOPIC = {FindingKind.SUBDURAL_HEMATOMA, FindingKind.EPIDURAL_HEMATOMA,
                      FindingKind.SUBARACHNOID_HEMORRHAGE}
_VENTRICLE_TOPIC = {FindingKind.ATROPHY, FindingKind.HYDROCEPHALUS}
_HEMORRHAGES = {FindingKind.INTRAPARENCHYMAL_HEMORRHAGE, FindingKind.SUBDURAL_HEMATOMA,
                FindingKind.EPIDURAL_HEMATOMA, FindingKind.SUBARACHNOID_HEMORRHAGE}


def write_report(findings: Sequence[Finding], rng: np.random.Generator) -> str:
    """A report for ``findings`` in the site's style (see :data:`report_template`).

    Parameters
    ----------
    findings
        The study's ground truth, including a derived midline-shift finding if any.
    rng
        The study's report generator: the same state gives the same text.
    """
    w = _Writer(rng)
    s = w.style
    kinds = {f.kind for f in findings}
    shift = next((f for f in findings if f.kind is FindingKind.MIDLINE_SHIFT), None)
    main = [f for f in findings if f.kind in _WRITERS]
    main.sort(key=lambda f: (_URGENCY[f.kind], -(f.volume_ml or f.size_mm or 0.0)))
    written = {id(f): _WRITERS[f.kind](w, f) for f in main}

    extra_axial = [written[id(f)][0] for f in main if f.kind in _EXTRA_AXIAL_TOPIC]
    if not kinds & _HEMORRHAGES:
        extra_axial.append(w.pick([
            f"No intracranial {s.hem()}.", f"No acute intracranial {s.hem()}.",
            f"There is no evidence of intracranial {s.hem()} or extra-axial collection.",
            f"No intracranial {s.hem()} or extra-axial collection."]))
    else:
        if not kinds & {FindingKind.SUBDURAL_HEMATOMA, FindingKind.EPIDURAL_HEMATOMA}:
            extra_axial.append(w.pick(["No extra-axial collection.", "No subdural or epidural collection."]))
        if FindingKind.SUBARACHNOID_HEMORRHAGE not in kinds and w.chance(0.6):
            extra_axial.append(f"No subarachnoid {s.hem()}.")

    parenchyma = [written[id(f)][0] for f in main
                  if f.kind not in _EXTRA_AXIAL_TOPIC and f.kind not in _VENTRICLE_TOPIC]
    parenchyma += [_calcification(w, f) for f in findings if f.kind is FindingKind.CALCIFICATION]
    if FindingKind.ACUTE_INFARCT not in kinds:
        parenchyma.append(w.pick([f"{s.grey().capitalize()}-white matter differentiation is preserved.",
                                  "No acute territorial infarct.",
                                  f"No acute territorial infarct; {s.grey()}-white matter differentiation is "
                                  f"maintained."]))
    if FindingKind.INTRAPARENCHYMAL_HEMORRHAGE not in kinds and kinds & _HEMORRHAGES and w.chance(0.5):
        parenchyma.append(f"No intraparenchymal {s.hem()}.")
    if not kinds & {FindingKind.INTRAPARENCHYMAL_HEMORRHAGE, FindingKind.ACUTE_INFARCT,
                    FindingKind.OLD_INFARCT, FindingKind.LACUNAR_INFARCT,
                    FindingKind.WHITE_MATTER_HYPODENSITY} and w.chance(0.5):
        parenchyma.append(w.pick(["No focal parenchymal lesion.",
                                  "The brain parenchyma is otherwise normal in attenuation."]))

    ventricles = [written[id(f)][0] for f in main if f.kind in _VENTRICLE_TOPIC]
    if not kinds & _VENTRICLE_TOPIC:
        ventricles.append(w.pick(["The ventricles and sulci are normal in size.",
                                  "The ventricles and sulci are normal in size and configuration.",
                                  "Normal size of the ventricles and sulci for age.",
                                  "No hydrocephalus."]
                                 if shift is None else
                                 ["The ventricles are otherwise normal in size.", "No hydrocephalus."]))
    elif FindingKind.ATROPHY in kinds and w.chance(0.4):
        ventricles.append("No hydrocephalus.")

    midline: list[str] = []
    shift_impression = ""
    if shift is not None:
        causes = [f for f in main if f.is_space_occupying and f.side.sign]
        lesion_side = causes[0].side if causes else shift.side.opposite
        text, shift_impression = _shift(w, shift, lesion_side)
        midline.append(text)
    else:
        midline.append(w.pick(["No midline shift.", "No mass effect or midline shift.",
                               "Midline structures are central.", "No midline shift or herniation."]))
        if FindingKind.SUBARACHNOID_HEMORRHAGE not in kinds and w.chance(0.5):
            midline.append("The basal cisterns are patent.")
    if not any(f.region is Region.CEREBELLUM for f in findings) and w.chance(0.4):
        midline.append("The posterior fossa structures are unremarkable.")

    bones = [w.pick(["The calvarium is intact.", "No skull fracture.", "The visualized skull is intact.",
                     "Grossly intact bony structures."]),
             w.pick(["The visualized paranasal sinuses and mastoid air cells are clear.",
                     "Paranasal sinuses and mastoids are well pneumatized and clear.",
                     "No remarkable finding of the paranasal sinuses and mastoids."])]
    if w.chance(0.5):
        bones.reverse()

    lines = [" ".join(part for part in group if part) for group in (extra_axial, parenchyma, ventricles,
                                                                  midline, bones)]
    impressions = [written[id(f)][1] for f in main]
    if shift_impression:
        if impressions and any(f.is_space_occupying for f in main):
            first = next(i for i, f in enumerate(main) if f.is_space_occupying)
            impressions[first] += f", with {shift_impression}"
        else:
            impressions.insert(0, shift_impression[0].upper() + shift_impression[1:])
    acute = kinds & (_HEMORRHAGES | {FindingKind.ACUTE_INFARCT}) or any(
        f.acuity is Acuity.ACUTE for f in main)
    if not impressions:
        impressions = [w.pick(["No acute intracranial abnormality.", "Normal non-contrast CT of the head.",
                               "No acute intracranial pathology.", "Unremarkable CT of the brain."])]
    elif not acute and w.chance(0.7):
        impressions.append(w.pick([f"No acute intracranial {s.hem()}.",
                                   "No acute intracranial abnormality."]))
    impressions = [text if text.endswith(".") else text + "." for text in impressions]
    if len(impressions) > 1 and s.numbered:
        impression_text = "\n".join(f"{i}. {text}" for i, text in enumerate(impressions, 1))
    else:
        impression_text = "\n".join(impressions)
    return "Findings:\n" + "\n".join(line for line in lines if line) + "\nImpression:\n" + impression_text
