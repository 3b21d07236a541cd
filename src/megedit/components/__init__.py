"""Plain ``nn.Module`` building blocks shared by the stages."""
