"""The results campaign: the scenario matrix (`matrix`, from configs/campaign.yaml), its runs and their cache
(`runs`), the statistics (`stats`), one scenario's aggregate (`aggregate`) and the pass/fail criteria
(`criteria`). The write-up is sim/campaign_report.py; scripts/results_campaign.py is the entry point."""
