import ChargeFS
print("chargefsd")
