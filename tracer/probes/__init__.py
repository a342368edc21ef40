"""The probe catalog (one declaration per probe) and what it means on this target: the plan, the BPF C
text, the layout, the event decoder.  Loads nothing.  Imports tracer.base and tracer.kernel."""
