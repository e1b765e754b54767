"""Stand-in with the official block_ap()'s interface (see ../README.md): no quantization, same log line."""
import copy
import time

import torch


class BlockTrainDataset:
    """Windows' hidden states in batches of `batch_size`, as the official class is called."""

    def __init__(self, size, seqlen, hidden_size, batch_size, dtype, cache_path=None, off_load_to_disk=False):
        self.data = torch.zeros(size // batch_size, batch_size, seqlen, hidden_size, dtype=dtype)

    def update_data(self, index, new_data):
        self.data[index] = new_data

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        return iter(self.data)


def block_ap(model, args, trainloader, valloader, logger=None):
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    layers, hidden = model.model.layers, model.config.hidden_size
    sets = {}
    for name, loader, size in (("train", trainloader, args.train_size), ("val", valloader, args.val_size)):
        sets[name] = BlockTrainDataset(size, args.training_seqlen, hidden, args.batch_size, dtype)
        for index in range(len(sets[name])):
            ids = torch.cat([loader[j][0] for j in range(index * args.batch_size, (index + 1) * args.batch_size)])
            with torch.no_grad():
                sets[name].update_data(index, model.model.embed_tokens(ids).to(dtype))
    for block_index in range(len(layers)):
        layer = layers[block_index].to(dev)
        trained = copy.deepcopy(layer).float()
        with torch.no_grad():
            targets = {k: [layer.float()(x.to(dev).float())[0] for x in v] for k, v in sets.items()}
        optimizer = torch.optim.AdamW(trained.parameters(), lr=args.weight_lr)
        for epoch in range(args.epochs):
            start = time.time()
            for x, y in zip(sets["train"], targets["train"]):
                loss = torch.nn.functional.mse_loss(trained(x.to(dev).float())[0], y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                val = [torch.nn.functional.mse_loss(trained(x.to(dev).float())[0], y).item()
                       for x, y in zip(sets["val"], targets["val"])]
            logger.info(f"blocks {block_index} epoch {epoch} recon_loss:{loss.item()} val_loss:{sum(val) / max(1, len(val))} "
                        f"time {time.time() - start} ")
        with torch.no_grad():
            for v in sets.values():
                for index, x in enumerate(v):
                    v.update_data(index, trained(x.to(dev).float())[0].to(dtype).cpu())
        layers[block_index] = trained.cpu()
    return model
