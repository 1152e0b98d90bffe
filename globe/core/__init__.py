"""The bottom layer: what every other layer shares and nothing in it depends on (besides errors).

    globe.core.mixing   PHI and compose(codes, bank, phi): the mixed atoms tilde_B_i = phi(sum_j alpha_ij B_j)
    globe.core.result   FamilyFit / FitResult: the tensors and metrics a fit returns and an artifact holds
    globe.core.params   parameter accounting of one family (stored vs dense)
    globe.core.shape    BankShape: m atoms and a rank per layer of one family's bank
    globe.core.files    atomic_write / atomic_write_text (temp file, fsync, rename)
"""
